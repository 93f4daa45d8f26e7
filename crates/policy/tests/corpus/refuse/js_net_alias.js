// expect: javascript.network
const n = require('node:net');
const c = n;
c.connect(80, 'example.invalid');
