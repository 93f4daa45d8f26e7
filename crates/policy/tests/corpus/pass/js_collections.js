const words = 'to be or not to be'.split(' ');
const counts = new Map();
for (const w of words) counts.set(w, (counts.get(w) ?? 0) + 1);
console.log([...counts].sort((a, b) => b[1] - a[1])[0], new Set(words).size);
