"""The run folder: its file names and lock (rundir), claims, the checkpoint schema, status, metrics, records, plots, TensorBoard."""
