"""What the tests share: fake data, one way to start a process, the fault harness, a SLURM
cluster. Not tests themselves."""
