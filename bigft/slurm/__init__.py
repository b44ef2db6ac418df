"""Slurm: render an sbatch script from the config, submit it, follow it, sweep, requeue.

This package must not import torch: `bigft --help` imports it.
"""
