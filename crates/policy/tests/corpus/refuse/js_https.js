// expect: javascript.network
require('https').get('https://example.invalid/', (r) => r.resume());
