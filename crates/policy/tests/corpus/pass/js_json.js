const data = JSON.parse('{"a": [1, 2, 3]}');
console.log(data.a.map((x) => x * 2).join(','));
