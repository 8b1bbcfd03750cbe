"""The child process of :func:`rankfed.flower.simulation.simulate`: ``python -m rankfed.flower._simrun SPEC``.

(A module of its own: ``python -m rankfed.flower.simulation`` would run a second copy of a
module the package has imported already.)
"""

import sys

from rankfed.flower.simulation import _child

if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
