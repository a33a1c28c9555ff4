"""python -m l3zh_local: the command line."""

from .cli import main

main()
