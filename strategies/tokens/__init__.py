"""Token selection policies (the token axis, ``strategy.tokens``): which tokens a site recomputes on a forecast step."""
