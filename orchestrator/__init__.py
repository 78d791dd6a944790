"""codsplat orchestrator: job documents, Bacalhau, the daemon and its AWS parts."""
