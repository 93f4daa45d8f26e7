// expect: javascript.dynamic-code
require('vm').runInNewContext('1 + 1');
