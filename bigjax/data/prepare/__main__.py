"""python -m bigjax.data.prepare: the bigjax-prepare command."""

from bigjax.data.prepare import main

main()
