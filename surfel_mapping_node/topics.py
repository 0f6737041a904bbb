"""Default topic names, frame ids and message types: one place for the node and the bag tools.

``surfel-map convert`` writes bags with these topics and
:class:`~surfel_mapping_node.datasets.rosbag.BagDataset` reads them. The mapping node
subscribes to relative names (``image``, ``depth``, ``pose``, ...);
``launch/kitti_replay.launch.xml`` remaps those to these topics, so a converted bag
plays straight into the node.

Frames follow REP 103/105: images live in optical frames (z forward, x right, y down)
and poses are given in ``map``. Depth registered to the color image carries the color
optical frame (as RealSense's ``aligned_depth_to_color`` does), so the depth topic
shares the color camera's CameraInfo.
"""

from __future__ import annotations

from dataclasses import dataclass

# RGB-D camera: color (rgb8) or intensity (mono8) image, registered depth, intrinsics.
IMAGE_TOPIC = "/camera/image"
DEPTH_TOPIC = "/camera/depth"
CAMERA_INFO_TOPIC = "/camera/camera_info"

# Rectified stereo pair and the intrinsics of each camera (the right camera's P
# contains the baseline term P[0, 3] = -fx * baseline_m, REP 104).
LEFT_IMAGE_TOPIC = "/stereo/left/image_rect"
RIGHT_IMAGE_TOPIC = "/stereo/right/image_rect"
LEFT_CAMERA_INFO_TOPIC = "/stereo/left/camera_info"
RIGHT_CAMERA_INFO_TOPIC = "/stereo/right/camera_info"

# SLAM output: the camera pose in the map (geometry_msgs/PoseStamped, camera-to-map,
# the pose of the image's optical frame) and the keyframe graph as a nav_msgs/Path
# whose poses are the keyframes, each identified by its header stamp.
POSE_TOPIC = "/slam/pose"
KEYFRAMES_TOPIC = "/slam/keyframes"

MAP_FRAME = "map"
COLOR_OPTICAL_FRAME = "camera_color_optical_frame"
# Registered depth is expressed in the color camera's frame.
DEPTH_OPTICAL_FRAME = COLOR_OPTICAL_FRAME
LEFT_OPTICAL_FRAME = "left_camera_optical_frame"
RIGHT_OPTICAL_FRAME = "right_camera_optical_frame"

# Keys of a converted bag's metadata.yaml custom_data: how the keyframes of the Path
# were chosen ("motion", "every_n", or "dataset" when the dataset marked them), and
# where the frames came from.
METADATA_KEYFRAMES = "surfel_perception.keyframes"
KEYFRAMES_FROM_DATASET = "dataset"
METADATA_SOURCE_FORMAT = "surfel_perception.source_format"
METADATA_SOURCE_PATH = "surfel_perception.source_path"
METADATA_SOURCE_FIRST = "surfel_perception.source_first"
METADATA_SOURCE_STRIDE = "surfel_perception.source_stride"
METADATA_SOURCE_SEQUENCE = "surfel_perception.source_sequence"

IMAGE_TYPE = "sensor_msgs/msg/Image"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
POSE_TYPE = "geometry_msgs/msg/PoseStamped"
# Also accepted on the pose topic when reading bags (pose.pose is the camera pose).
ODOMETRY_TYPE = "nav_msgs/msg/Odometry"
PATH_TYPE = "nav_msgs/msg/Path"


@dataclass(frozen=True)
class TopicNames:
    """The topic names of one recording; the defaults are the module constants above.

    Override single names to read or write bags that use other topics, e.g.
    ``TopicNames(image="/camera/color/image_raw")``.
    """

    image: str = IMAGE_TOPIC
    depth: str = DEPTH_TOPIC
    camera_info: str = CAMERA_INFO_TOPIC
    left_image: str = LEFT_IMAGE_TOPIC
    right_image: str = RIGHT_IMAGE_TOPIC
    left_camera_info: str = LEFT_CAMERA_INFO_TOPIC
    right_camera_info: str = RIGHT_CAMERA_INFO_TOPIC
    pose: str = POSE_TOPIC
    keyframes: str = KEYFRAMES_TOPIC

    def rgbd(self) -> tuple[str, str, str]:
        """Return the RGB-D topics: image, depth, camera_info."""
        return (self.image, self.depth, self.camera_info)

    def stereo(self) -> tuple[str, str, str, str]:
        """Return the stereo topics: left image, right image, left and right camera_info."""
        return (self.left_image, self.right_image, self.left_camera_info, self.right_camera_info)


DEFAULT_TOPICS = TopicNames()
