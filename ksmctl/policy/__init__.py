"""Where decisions are made: the policy format (model), its loader, and decide()."""
