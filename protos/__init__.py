"""Protocol buffer definitions: UPI v1 and internal messages (arrive with the UPI issue)."""
