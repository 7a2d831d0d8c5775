"""Acquisition: the production RunEngine (:mod:`.runengine`), cancellation that aborts it cleanly
(:mod:`.cancellation`) and dry-runs of plans on simulated devices (:mod:`.dryrun`)."""
