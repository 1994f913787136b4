"""Segments as surfaces: tifxyz meshes, their normals, and lazy renders from the scroll.

:mod:`.tifxyz` reads a tifxyz folder into a :class:`~.tifxyz.Surface`; :mod:`.grid`
maps full-resolution pixels onto its grid; :mod:`.normals` gives its unit normals;
:mod:`.render` samples a scroll volume along them into a lazy surface volume. Reads
go through :mod:`vesuvius_dask.io`; nothing here imports sampling or above.
"""
