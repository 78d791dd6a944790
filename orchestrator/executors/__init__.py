"""The executors: where a job's attempts run. Each implements `compute.Executor`."""
