"""Extract the land outline (union of Natural Earth 1:110m admin-0 countries) from the
shapefile that geopandas 0.14.4 ships (geopandas/datasets/naturalearth_lowres) into a
small GeoJSON of land polygons, coordinates rounded to 0.01 degree."""
import json, struct, sys
import numpy as np
import shapely
from shapely.geometry import Polygon, MultiPolygon, mapping
from shapely.ops import unary_union

def read_polygons(shp):
    data = open(shp, "rb").read()
    pos, out = 100, []
    while pos < len(data):
        _, clen = struct.unpack(">2i", data[pos:pos + 8]); pos += 8
        rec = data[pos:pos + 2 * clen]; pos += 2 * clen
        stype = struct.unpack("<i", rec[:4])[0]
        if stype == 0: continue
        assert stype == 5, stype
        nparts, npts = struct.unpack("<2i", rec[36:44])
        parts = list(struct.unpack(f"<{nparts}i", rec[44:44 + 4 * nparts])) + [npts]
        pts = np.frombuffer(rec[44 + 4 * nparts:44 + 4 * nparts + 16 * npts], "<f8").reshape(-1, 2)
        rings = [pts[parts[i]:parts[i + 1]] for i in range(nparts)]
        # shapefile: outer rings clockwise, holes counter-clockwise
        polys = []
        for r in rings:
            if shapely.LinearRing(r).is_ccw and polys:
                polys[-1][1].append(r)
            else:
                polys.append((r, []))
        out += [Polygon(s, h).buffer(0) for s, h in polys]
    return out

polys = read_polygons(sys.argv[1])
land = unary_union(polys).simplify(0.05)
land = shapely.set_precision(land, 0.01)
geoms = list(land.geoms) if hasattr(land, "geoms") else [land]
print(len(polys), "country polygons ->", len(geoms), "land polygons")
def r(c): return [[round(x, 2), round(y, 2)] for x, y in c]
feat = {"type": "Feature", "properties": {"name": "land"},
        "geometry": {"type": "MultiPolygon", "coordinates": [[r(g.exterior.coords)] + [r(i.coords) for i in g.interiors] for g in geoms]}}
json.dump({"type": "FeatureCollection", "features": [feat]}, open(sys.argv[2], "w"), separators=(",", ":"))
