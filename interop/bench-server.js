'use strict';

// The Node baseline for `tether bench --target`: @metarhia/jstp 2.3.0 hosting its own test
// fixture's someService on TCP and WS, with nothing else running (no logging), so its CPU time
// per call is the library's. Prints one JSON line: {"ready":true,"tcp":PORT,"ws":PORT}.
//   node bench-server.js

const warn = console.warn;
console.warn = () => {}; // mdsf's notice about its missing native addon
const jstp = require('@metarhia/jstp');
console.warn = warn;

const application = new jstp.Application('testApp', {
  someService: {
    sayHi(connection, name, callback) {
      callback(null, `Hi, ${name}!`);
    },
  },
});
const options = { applications: [application] };
const tcp = jstp.net.createServer(options);
const ws = jstp.ws.createServer(options, {});
tcp.listen(0, '127.0.0.1', () => {
  ws.listen(0, '127.0.0.1', () => {
    process.stdout.write(JSON.stringify({
      ready: true, tcp: tcp.address().port, ws: ws.address().port,
    }) + '\n');
  });
});
