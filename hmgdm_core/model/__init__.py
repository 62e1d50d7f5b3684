"""H-MGDM: stage-1 entity autoencoder + stage-2 entity-masked latent graph diffusion.

Import the parts from their modules (`hmgdm_core.model.hmgdm`, ...); this package stays light so
`hmgdm_core.config` can import the config sections without pulling in torch.
"""
