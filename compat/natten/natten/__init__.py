"""NATTEN's module paths over natten_rs (the ``natten`` distribution from the natten_rs repo).

The module tree (``natten.functional``, ``natten.context``, ``natten.utils``, ``natten.na2d``,
...) is built by ``natten_rs.compat.populate``, the same code ``natten_rs.compat.install()``
uses.
"""

from natten_rs.compat import populate as _populate

_populate(globals(), __name__)
