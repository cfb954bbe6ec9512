"""The exercise checkers, one module per chapter, named after it (``ch01_five_steps`` checks
the exercises of ``chapters/01_five_steps.ipynb``, ...), and their shared machinery
(``_core``: run a learner's function on fresh inputs, compare it with bnkit, and name the
mistake). A chapter's check cell calls ``check.<exercise>(my_function)`` after
``from bnkit.checks import chNN_... as check``.
"""
from bnkit.checks._core import ExerciseError

__all__ = ["ExerciseError"]
