"""`python -m bigft ...` (used by `accelerate launch -m bigft` and `torchrun -m bigft`)."""

from bigft.cli import main

main()
