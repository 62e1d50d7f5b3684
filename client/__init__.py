"""A hospital's side of hmgdm: build entity graphs, train locally, join the federation."""
