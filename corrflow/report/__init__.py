"""What people see of a run: progress (:mod:`.progress`), the PNG report (:mod:`.png`) and, for
simulated instruments, scores against the simulated ground truth (:mod:`.ground_truth`)."""
