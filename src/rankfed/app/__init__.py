"""The application layer: experiment files, the ``rankfed`` command, and what they run.

* :mod:`.config` - the TOML experiment file, checked by the Python objects it describes;
* :mod:`.experiment` - an experiment file to a :class:`rankfed.Federation`;
* :mod:`.cli` - the ``rankfed`` command; :mod:`.analyze` - ``rankfed analyze`` on run folders;
* :mod:`.flower` - ``rankfed flower run`` and the Flower App of experiment files;
* :mod:`.ddp` - ``rankfed ddp``.

Everything here builds on the Python API; nothing below imports it.
"""
