const { floor, max } = Math;
const [first, ...rest] = [3.7, 1, 2];
console.log(floor(first), max(...rest), JSON.stringify({ first, rest }));
