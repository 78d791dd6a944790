// The splat viewer: three.js + Spark, bundled by esbuild into static/dist/viewer.js (no CDN at run time).
// It reads the splat's URL from the page, opens at a held-out photo's camera (cameras.json) or else
// frames the splat's bounding box, and orbits with the mouse.
// It draws only when something changed (the camera, the canvas size, or Spark finishing a sort), so an
// idle viewer costs nothing: on a laptop or a software renderer a constant render loop holds the CPU/GPU.
// window.codsplatViewer exposes `ready` (the picture on screen is final for this view), `orbit(degrees)`,
// `opened_at` and `camera`, so tests (and people) can move the camera, know when it has been drawn, and
// see where the view opened.
import * as THREE from "three";
import { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";
import { SparkRenderer, SplatMesh } from "@sparkjsdev/spark";

async function fetchCamera(url) {
  try {
    const res = await fetch(url);
    return res.ok ? (await res.json()).views[0] || null : null;
  } catch {
    return null; // no cameras.json (older results): frame the splat's bounding box instead
  }
}

async function start(container) {
  const url = container.dataset.splat;
  const renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true });
  renderer.setPixelRatio(Math.min(window.devicePixelRatio, 2));
  renderer.setClearColor(0x101418, 1);
  container.appendChild(renderer.domElement);
  const scene = new THREE.Scene();
  const camera = new THREE.PerspectiveCamera(50, 1, 0.01, 1000);

  // One frame per animation tick at most, and only when asked for.
  let frames = 0;
  let lastDraw = 0;
  let requested = false;
  const draw = () => {
    if (requested) return;
    requested = true;
    requestAnimationFrame(() => {
      requested = false;
      renderer.render(scene, camera);
      frames += 1;
      lastDraw = performance.now();
    });
  };
  // Spark calls onDirty when a sort (run in a worker after the view moved) is ready to be drawn.
  const spark = new SparkRenderer({ renderer, onDirty: draw });
  scene.add(spark);

  const resize = () => {
    const { clientWidth: w, clientHeight: h } = container;
    renderer.setSize(w, h, false);
    camera.aspect = w / Math.max(h, 1);
    camera.updateProjectionMatrix();
    draw();
  };
  new ResizeObserver(resize).observe(container);
  resize();

  // The world is COLMAP's (x right, y down, z ahead: RDF); three.js's is RUB. The .ply and .splat
  // hold RDF, so they are turned over (180° about x). The .spz holds RUB, as its spec says, and
  // Spark reads it as stored, so it is drawn as it is. The cameras are RDF whatever the file.
  const rdfToWorld = new THREE.Matrix4().makeRotationX(Math.PI);
  const splat = new SplatMesh({ url });
  if (!new URL(url, window.location.href).pathname.endsWith(".spz")) splat.quaternion.set(1, 0, 0, 0);
  scene.add(splat);
  await splat.initialized;

  splat.updateMatrixWorld();
  const box = splat.getBoundingBox(true).applyMatrix4(splat.matrixWorld);
  const centre = box.getCenter(new THREE.Vector3());
  const radius = Math.max(box.getSize(new THREE.Vector3()).length() / 2, 1e-3);
  const photo = container.dataset.cameras ? await fetchCamera(container.dataset.cameras) : null;
  let target = centre;
  if (photo) {
    // open where a held-out photo was taken, looking the way it looked
    const toWorld = (v) => v.applyMatrix4(rdfToWorld);
    const c2w = new THREE.Matrix4().set(...photo.world_to_camera.flat()).invert();
    const eye = toWorld(new THREE.Vector3().setFromMatrixPosition(c2w));
    const ahead = toWorld(new THREE.Vector3(0, 0, 1).applyMatrix4(c2w)).sub(eye).normalize();
    const up = toWorld(new THREE.Vector3(0, -1, 0).applyMatrix4(c2w)).sub(eye).normalize();
    const depth = Math.max(centre.clone().sub(eye).dot(ahead), radius * 0.1);
    camera.position.copy(eye);
    camera.up.copy(up); // before the controls are made: they orbit about the camera's up
    target = eye.clone().addScaledVector(ahead, depth);
    camera.fov = (2 * Math.atan(photo.height / (2 * photo.fy)) * 180) / Math.PI;
  } else {
    camera.position.copy(centre).add(new THREE.Vector3(0, radius * 0.3, radius * 1.6));
  }
  const controls = new OrbitControls(camera, renderer.domElement);
  controls.addEventListener("change", draw); // the mouse, the wheel and orbit() all land here
  controls.target.copy(target);
  camera.near = radius / 500;
  camera.far = radius * 50;
  camera.updateProjectionMatrix();
  controls.update();
  draw();

  const viewer = {
    splats: splat.numSplats,
    // ready: the last frame drew a finished sort for this view, and nothing else is on its way
    get ready() {
      return spark.lastSortTime > 0 && !requested && !spark.dirty && !spark.sorting && !spark.sortDirty &&
        performance.now() - lastDraw > 100;
    },
    get frames() { return frames; },
    opened_at: photo ? photo.name : null, // the held-out photo whose camera the view opened at
    get camera() {
      return { position: camera.position.toArray(), up: camera.up.toArray(), fov: camera.fov, target: controls.target.toArray() };
    },
    orbit(degrees) {
      const offset = camera.position.clone().sub(controls.target);
      offset.applyAxisAngle(camera.up, (degrees * Math.PI) / 180);
      camera.position.copy(controls.target).add(offset);
      controls.update();
    },
  };
  window.codsplatViewer = viewer;
}

const container = document.getElementById("viewer");
if (container) {
  start(container).catch((err) => {
    container.textContent = `Could not show the splat: ${err.message || err}`;
    window.codsplatViewer = { ready: false, error: String(err) };
  });
}
