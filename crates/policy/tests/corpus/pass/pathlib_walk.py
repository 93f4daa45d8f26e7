from pathlib import Path

total = 0
for p in Path('.').rglob('*.py'):
    total += len(p.read_text().splitlines())
print(total)
