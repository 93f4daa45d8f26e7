// expect: javascript.network
fetch('http://example.invalid/').then((r) => r.text()).then(console.log);
