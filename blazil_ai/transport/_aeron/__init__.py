"""Native binding over Aeron's C client (built by scripts/build_aeron.sh)."""
