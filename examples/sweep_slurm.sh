#!/bin/bash
# The example sweep as a multi-process SLURM job: `sbatch examples/sweep_slurm.sh` from the repository root.
# Every task runs the same command; jax.distributed finds the job from SLURM's environment (SLURM_NTASKS,
# SLURM_PROCID, the step's node list), chains are sharded over every device of every task, and task 0 alone writes
# sweep-out/ (so it may be on task 0's local disk, but a resubmission must then run task 0 there too; a shared
# folder is simpler). Resubmit the same script to resume after a crash or a time limit. Not run on a real SLURM
# cluster in this repository's tests (they start 2 processes on one machine with --coordinator instead).
#SBATCH --job-name=degenjax-sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=01:00:00

srun degenjax sweep examples/sweep.toml --out sweep-out --distributed --no-progress
