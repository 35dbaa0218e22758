"""`python -m cli ...` (and `torchrun -m cli ...`) run the same app as `twostream`."""

from cli.app import main

main()
