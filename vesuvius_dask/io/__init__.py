"""Reading what is stored.

What a path is, the volume record, Zarr / OME-Zarr / TIFF / numpy opening,
stored-chunk decoding, segments, labels and masks, ``info``.
"""
