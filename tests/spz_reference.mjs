// Niantic's reference SPZ library (@adobe/spz: nianticlabs/spz compiled to WebAssembly), as a
// spec-following reader and writer for the format tests.
//
//   node tests/spz_reference.mjs read FILE.spz RDF        → the decoded cloud as JSON, in RDF axes
//   node tests/spz_reference.mjs write CLOUD.json OUT.spz  → OUT.spz from a cloud in RDF axes
//                                                            (version 3, the reference's own quantisation)
import { readFileSync, writeFileSync } from 'node:fs';
import createSpzModule from '@adobe/spz';

const [command, source, target] = process.argv.slice(2);
// the library logs each load on stdout; keep stdout for the JSON
const spz = await createSpzModule({ print: (text) => process.stderr.write(`${text}\n`) });
const ATTRIBUTES = ['positions', 'scales', 'rotations', 'alphas', 'colors', 'sh'];

if (command === 'read') {
  const cloud = spz.loadSpzFromBuffer(new Uint8Array(readFileSync(source)), { to: spz.CoordinateSystem[target] });
  const out = { numPoints: cloud.numPoints, shDegree: cloud.shDegree };
  // JSON has no Infinity: a saturated alpha (255) decodes to +Infinity, sent as a string
  for (const key of ATTRIBUTES) out[key] = Array.from(cloud[key], (v) => (Number.isFinite(v) ? v : String(v)));
  process.stdout.write(JSON.stringify(out));
} else if (command === 'write') {
  const given = JSON.parse(readFileSync(source, 'utf8'));
  const cloud = { numPoints: given.numPoints, shDegree: given.shDegree, antialiased: false, extensions: [] };
  for (const key of ATTRIBUTES) cloud[key] = new Float32Array(given[key]);
  const bytes = spz.saveSpzToBuffer(cloud, { version: 3, from: spz.CoordinateSystem.RDF, sh1Bits: 5, shRestBits: 4 });
  writeFileSync(target, bytes);
} else {
  process.stderr.write('usage: spz_reference.mjs read FILE.spz AXES | write CLOUD.json OUT.spz\n');
  process.exit(2);
}
