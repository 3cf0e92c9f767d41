"""Array kernels, written once for NumPy and CuPy (one ``xp``): filters, CLAHE, resampling, k-means, tiles.

They know nothing of micrographs, models or files; everything above them may use them.
"""
