"""effarch: the library behind Module 2.4, Efficient Architectures.

Importing the package does no work: every module is imported on first use.
"""

__version__ = "0.1.0"
