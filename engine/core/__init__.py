"""The I/O-free core: bytes and values in, values and bytes out.

Nothing under this package may import twisted, open sockets or files, read a clock
or draw random numbers; those are passed in by the shell (a test enforces it).
"""
