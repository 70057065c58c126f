"""mailplat's built-in backends; each registers through twisted/plugins like any plugin."""
