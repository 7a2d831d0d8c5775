"""The Tiled catalog: clients and configuration (:mod:`.tiled`), the document filter that keeps one
event per ``seq_num`` after a resume (:mod:`.filters`), and the closing of runs whose producer died
(:mod:`.reconcile`)."""
