# shellcheck shell=bash
# An example SETUP_FILE: copy it (e.g. to ~/fmnist-setup.sh), keep the lines your site needs,
# and submit with SETUP_FILE=~/fmnist-setup.sh sbatch slurm/....sbatch. The scripts source it
# at the start of the job and, for several nodes, on every node before its launcher starts;
# it must end with a command that succeeds. Keep it to the environment: the head node's
# address, the port and the run's settings are the scripts' (see slurm/README.md).

# Environment modules (names and versions are your site's):
# module purge
# module load cuda/12.4 python/3.11

# A conda environment:
# source "$HOME/miniconda3/etc/profile.d/conda.sh"
# conda activate fmnist

# Or a virtual environment (on a file system every node sees):
# source "$HOME/fmnist-accel/.venv/bin/activate"

# NCCL on a cluster with several networks: the one the GPUs' traffic should take.
# export NCCL_SOCKET_IFNAME=ib0
