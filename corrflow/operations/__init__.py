"""Operations: the production servers and workers (:mod:`.server`), `corrflow deploy`
(:mod:`.deploy`), the experiment queue (:mod:`.queue`) and the simulated EPICS facility's processes
(:mod:`.sim_facility`)."""
