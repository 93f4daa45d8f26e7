# expect: javascript.network
node <<'EOF'
const http = require('http');
http.get('http://example.invalid/');
EOF
