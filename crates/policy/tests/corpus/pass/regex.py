import re

pattern = re.compile(r'(\d{4})-(\d{2})-(\d{2})')
for line in open('log.txt'):
    m = pattern.search(line)
    if m:
        print(m.group(1))
