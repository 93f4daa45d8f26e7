from collections import Counter, defaultdict

words = open('text.txt').read().split()
c = Counter(words)
by_len = defaultdict(list)
for w in c:
    by_len[len(w)].append(w)
print(c.most_common(5))
