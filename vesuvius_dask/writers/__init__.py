"""Writing outputs safely.

The output job (inputs sacred, atomic publish, resume), ``convert`` and ``predict``.
"""
