"""`python -m bigft ...` (used by `accelerate launch -m bigft` and `torchrun -m bigft`)."""

from bigft.commands import main

main()
