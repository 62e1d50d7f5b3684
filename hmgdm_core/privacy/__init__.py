"""Differential privacy: the run's [privacy] and a site's own [local_dp] configs, patient-level
DP-SGD, accounting, the site ledger.

Import the parts from their modules; this package stays light so `hmgdm_core.config` can import
`PrivacyConfig` without pulling in torch or opacus.
"""
