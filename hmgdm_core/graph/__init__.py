"""Entity graphs: slide or image -> SLIC superpixels -> node/edge features -> PyG `Data`.

Contract of one region graph (a tile of a slide, or a whole plain image):
  x            float32 (N, Dx)        entity descriptors (names: `x_names` in the cache file)
  win          uint8   (N, 3, W, W)   RGB instance window centred on the entity centroid
  edge_index   int64   (2, E)         both directions, no self-loops, no duplicates
  edge_attr    float32 (E, De)        edge descriptors (names: `edge_attr_names`)
  edge_win     uint8   (E, 3, W, W)   RGB window at the shared-boundary midpoint (optional)
  pos          float32 (N, 2)         entity centroid (x, y) in µm, slide coordinates
  tile_origin  float32 (1, 2)         (x, y) µm of the read region's pixel (0, 0), margin included
"""
