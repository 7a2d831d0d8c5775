"""Verified transfer between facility storage areas: the local verified copy (:mod:`.verified`), the
pull backends (SFTP, :mod:`.backends`) and Globus (:mod:`.globus`)."""
