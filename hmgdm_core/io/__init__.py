"""Reading slides and images at a target resolution, and finding the tissue on them."""
