"""Identity-based L4 authorization: the policy model, its parsing and the decision engine."""
