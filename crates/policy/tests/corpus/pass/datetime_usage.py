from datetime import datetime, timedelta, timezone

now = datetime.now(timezone.utc)
print((now - timedelta(days=7)).isoformat())
