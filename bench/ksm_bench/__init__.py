"""The KSM benchmark: ksmctl against what hosts run today, on the real kernel."""
